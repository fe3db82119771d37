"""The modular model: its data, network, training, module importance and selection,
and the trained model on disk."""
