"""The auxiliary pool: safetensors featurizers with a sha256 manifest."""
