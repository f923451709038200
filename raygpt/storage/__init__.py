"""Where bytes live: local files written atomically, URIs (object storage through pyarrow), and datasets
in object storage staged to each node."""
