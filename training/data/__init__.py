"""Bucketed, resumable loading of curation outputs for the DiT and VAE trainers.

    from training.data.loader import BucketLoader

    loader = BucketLoader(cfg.loader)                # LoaderConfig; rank/world from torch.distributed
    loader.load_state_dict(checkpoint["loader"])     # optional: exact resume
    for batch in loader:                             # endless; epochs roll over
        ...                                          # batch["video"]: [B, 3, T, H, W]; see loader.py
        checkpoint["loader"] = loader.state_dict()  # the state AFTER the batches handed out

How a sample travels, one module per stage:

    index.py    shards/index.parquet of every data directory -> Samples (one row per clip, with the
                bucket curation assigned it) -> BucketSpec per bucket: size, tokens per sample,
                batch per rank from the token budget, samples per epoch from the token weights.
                No tar is opened to plan.
    plan.py     (seed, epoch, cursors) -> the endless sequence of global batches (Step): which
                bucket each step takes and which samples; the same on every rank and worker.
    decode.py   one clip's mp4 bytes -> its first frames at the bucket's stride, resized to cover
                the bucket's size and centre-cropped; the caption drawn for this epoch.
    dataset.py  a Step -> this rank's slice of it, read from the shards by random access, decoded
                in a DataLoader worker into one batch tensor; corrupt samples replaced.
    latents.py  (latent caches, training.cache) one cache entry -> its posterior and the encoder
                rows of the caption drawn for the epoch, instead of decode.py
    loader.py   DataLoader workers over the dataset -> batches in step order, with the state after
                each batch (what a checkpoint saves), stats and logs.

Every module is importable without starting workers; only BucketLoader iteration does.
"""
