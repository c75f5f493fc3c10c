"""The model-directory format: model.json and its fold entries (written by training and local mode, read by inference)."""
