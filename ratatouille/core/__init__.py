"""The shared vocabulary: typed config, arm registry, names, seeds, the UserError base."""
