"""The output folder: its life (writer), trainer formats, the dataset card, the manifest, the summary and the report."""
