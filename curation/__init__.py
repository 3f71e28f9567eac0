"""spacetime curation: raw video -> native-resolution clips in WebDataset shards (Ray Data).

Also home of what every package shares: the data contract (`curation.shards`), typed configs
(`curation.config`) and the `spacetime` command (`curation.cli`). Keep this file import-free: a
`.pth` hook imports `curation._torchvision_shim` in every Python process of the environment.
"""
