"""What a run writes: the checkpoint and its metadata, or a Hub-ready folder (weights,
config.json, model card, report, plots), and the upload of such a folder to the Hub."""
