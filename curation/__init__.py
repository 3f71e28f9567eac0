"""spacetime curation: raw video -> native-resolution clips in WebDataset shards (Ray Data).

`pipeline.py` lists the stages. The data contract, configs machinery and I/O it uses live in the
kernel (`spacetime`); captioning comes from the `captioner` library through the `caption` stage.
"""
