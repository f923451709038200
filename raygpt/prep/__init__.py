"""Dataset preparation: the output folder (meta.json last), one corpus tokenising loop (threads or Ray tasks),
the two Shakespeare sets, and prepare_dataset, which prepares any of them by name, locally or to a URI."""
