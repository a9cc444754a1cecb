"""The training engine: timm featurizer with frozen BN, fine-tuning, linear probe, Table 3."""
