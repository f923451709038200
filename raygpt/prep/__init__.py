"""Dataset preparation: the dataset output folder and one corpus tokenising loop (threads or Ray tasks)."""
