"""Data: the image contract (decode), the ImageFolder layout (folder), manifests, prepared splits,
loaders and transforms, and the example and planted datasets."""
