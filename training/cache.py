"""`spacetime train cache`: the latent cache, so that DiT training decodes no video and runs no VAE or
text encoder in its step.

    spacetime train cache --config configs/train/tiny.yaml --data OUT --output CACHE
    torchrun --nproc-per-node 8 -m spacetime train cache --config C --data OUT --output CACHE
    spacetime train dit --config configs/train/tiny.yaml --data CACHE --output RUN

What is cached, per clip of the curation index (layout: spacetime.contract, "latent cache"):
- the VAE posterior (mean and log-variance, UNnormalised, float32) of exactly the frames the loader
  would hand the trainer: the bucket's size and frame tier, `loader.target_fps` stride,
  `loader.interpolation` (training.data.decode); with `loader.packing`, each clip's native size and
  frames instead (training.data.packing), for packed training from the cache. Training draws z = mean + exp(logvar / 2) * eps
  from its own generator when `vae.sample_posterior` is set, then normalises with the VAE the config
  names, so sampling stays exact and per step;
- the text encoder's output for the dense caption, the short caption and (once) the empty caption,
  so caption dropout and short-caption sampling are drawn per (seed, epoch, clip) as with videos.

Cache key. `cache.json` holds the key: the VAE fingerprint (a hash of its weights and architecture,
normalisation excluded), the encode dtype, the text encoder's fingerprint (a sampled hash of its
folder's files: weights, tokenizer and config) with max_length, dtype and width, and the frame
sampling. Every entry is content-addressed by that key + clip id + bucket size/frames + stride +
its captions (`entry_address`). A cache built with another key is refused, by `train cache` on the
same output (unless --rebuild) and by `train dit` reading it, with a message that says what differs.

Work units. The index's samples, in the loader's canonical order, are cut into units of
`cache.entries_per_shard`; unit N becomes shards/NNNNNN.tar, then its completion record
.work/units/NNNNNN.json (index rows + errors). Rank r of W builds units r, r + W, ...; units do not
depend on W and every entry is encoded alone (batch 1) with deterministic kernels, so a kill and a
rerun, or another world size, give byte-identical shards, each entry exactly once. When every unit
is recorded, rank 0 writes index.parquet, null_text.npy, then cache.json with state complete.

A clip that fails to read or decode is recorded (clip id, shard, reason) in its unit's record and
the summary, and left out of the cache; the rest of the run continues.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from spacetime import contract
from spacetime.config import ConfigError, load_config
from spacetime.errors import UserError, describe
from spacetime.faults import is_infrastructure
from spacetime.store import Store
from training.data.dataset import to_unit_range
from training.data.decode import sample_frames
from training.data.index import Samples, bucket_specs, read_index
from training.data.latents import npy_bytes
from training.parallel import Dist, init_distributed
from training.train_config import TrainConfig

log = logging.getLogger(__name__)

_SAMPLE_BYTES = 64 * 1024  # per window of a sampled file hash
_WINDOWS = 16
_WHOLE = 16 * 1024 * 1024  # files up to this size are hashed whole


class CacheMismatch(UserError, ValueError):
    """A cache built with other models, frame sampling or data than asked for."""


# -------------------------------------------------------------------------------- fingerprints
def tensors_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 of every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """The VAE's weights and architecture. Normalisation (scaling / shift) is left out: the cache
    holds the UNnormalised posterior and training normalises with the VAE the config names."""
    arch = getattr(vae, "arch", None)
    if arch is not None:
        described = arch.model_dump(mode="json", exclude={"scaling_factor", "shift_factor"})
    else:  # a diffusers VAE: its config
        described = {k: v for k, v in dict(vae.model.config).items() if not k.startswith("_")}
    h = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode())
    h.update(tensors_fingerprint(vae.state_dict()).encode())
    return h.hexdigest()[:32]


def folder_fingerprint(folder: Path) -> str:
    """sha256 of a model folder's files (hidden ones excepted): names, sizes and content, files over
    16 MiB by 16 windows of 64 KiB spread over the file (any retrained or other model changes them;
    reading a 10 GB encoder stays a second)."""
    h = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.relative_to(folder).as_posix()}:{size}\n".encode())
        with open(path, "rb") as f:
            if size <= _WHOLE:
                h.update(f.read())
                continue
            for k in range(_WINDOWS):
                f.seek(k * (size - _SAMPLE_BYTES) // (_WINDOWS - 1))
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()[:32]


def text_encoder_fingerprint(ref: str) -> str:
    """The fingerprint of the text encoder a config names (a local folder, a tiny: reference, or a
    Hugging Face id already in the local hub cache)."""
    from spacetime.models import resolve

    path = resolve(ref)
    folder = Path(path).expanduser()
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(path, local_files_only=True))
        except Exception as err:
            raise ConfigError(f"text_encoder.path {ref!r}: not a local folder nor in the local Hugging Face "
                              f"cache ({type(err).__name__}); the cache key needs its files") from None
    return folder_fingerprint(folder)


def _resolved_dtype(name: str, device: torch.device) -> str:
    return name if name != "auto" else ("bfloat16" if device.type == "cuda" else "float32")


def cache_key(cfg: TrainConfig, vae_fp: str, text_fp: str, text_dim: int, device: torch.device) -> dict:
    """What every entry of a cache depends on besides the clip itself."""
    return {"format": contract.CACHE_FORMAT,
            "vae": {"fingerprint": vae_fp, "dtype": _resolved_dtype(cfg.vae.dtype, device)},
            "text_encoder": {"fingerprint": text_fp, "max_length": cfg.text_encoder.max_length,
                             "dtype": _resolved_dtype(cfg.text_encoder.dtype, device), "dim": text_dim},
            "frames": frames_key(cfg)}


def frames_key(cfg: TrainConfig) -> dict:
    """How an entry's frames are sampled: the stride and resampling, and with loader.packing the
    limits that fix each clip's native size (training.data.packing); a bucketed cache's key is as it was."""
    key = {"target_fps": cfg.loader.target_fps, "interpolation": cfg.loader.interpolation}
    if cfg.loader.packing:
        key["native"] = {"max_tokens_per_sample": cfg.loader.max_tokens_per_sample or cfg.loader.token_budget,
                         "max_frames": cfg.loader.max_frames}
    return key


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def entry_address(digest: str, clip_id: str, bucket: str, size: tuple[int, int], frames: int, stride: int,
                  dense: str, short: str | None) -> str:
    """Content address of one entry: the cache key's digest + clip + target + stride + captions."""
    text = json.dumps([digest, clip_id, bucket, list(size), frames, stride, dense, short])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def key_differences(built: dict, wanted: dict) -> list[str]:
    """'vae.fingerprint: 1a2b… (cache) vs 3c4d… (config)' for every field that differs."""
    a, b = _flat(built), _flat(wanted)
    return [f"{k}: {a.get(k)!r} (cache) vs {b.get(k)!r} (now)" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# ------------------------------------------------------------------------------------ reading
def read_manifest(root: str, s3) -> dict | None:
    """cache.json of `root` if it is a latent cache, else None."""
    store = Store(root, s3)
    if not contract.is_cache(store):
        return None
    return json.loads(store.read_bytes(contract.CACHE_MANIFEST))


def training_cache(cfg: TrainConfig) -> dict | None:
    """The manifest of the cache(s) loader.data names (all with one key), None when they are
    curation outputs; a mix, or an unfinished cache, is an error."""
    manifests = [read_manifest(root, cfg.loader.s3) for root in cfg.loader.data]
    if all(m is None for m in manifests):
        return None
    if any(m is None for m in manifests):
        raise ConfigError(f"loader.data {cfg.loader.data} mixes latent caches and curation outputs: train "
                          "on caches only (build one per output with `spacetime train cache`) or on outputs only")
    for root, m in zip(cfg.loader.data, manifests):
        if m.get("format") != contract.CACHE_FORMAT:
            raise ConfigError(f"{root}: cache format {m.get('format')!r}, this code reads {contract.CACHE_FORMAT}")
        if m["state"] != "complete":
            raise ConfigError(f"{root}: the latent cache is unfinished (state {m['state']}); rerun the same "
                              "`spacetime train cache` command to complete it")
        if m["key_digest"] != manifests[0]["key_digest"]:
            raise ConfigError(f"{root} and {cfg.loader.data[0]} are caches with different keys: "
                              + "; ".join(key_differences(manifests[0]["key"], m["key"])))
    return manifests[0]


def check_training_cache(manifest: dict, cfg: TrainConfig, vae: torch.nn.Module, where: str) -> None:
    """Refuse to train from a cache built with another VAE, text encoder or frame sampling than the
    config names (dtypes may differ: they are logged)."""
    built = manifest["key"]
    now = {"vae": {"fingerprint": vae_fingerprint(vae)},
           "text_encoder": {"fingerprint": text_encoder_fingerprint(cfg.text_encoder.path),
                            "max_length": cfg.text_encoder.max_length},
           "frames": frames_key(cfg)}
    mine = {"vae": {"fingerprint": built["vae"]["fingerprint"]},
            "text_encoder": {k: built["text_encoder"][k] for k in ("fingerprint", "max_length")},
            "frames": built["frames"]}
    diffs = key_differences(mine, now)
    if diffs:
        raise CacheMismatch(f"{where}: this latent cache was built with other models or frame sampling than "
                            f"this config's ({'; '.join(diffs)}). Rebuild it: spacetime train cache --config "
                            f"<this config> --data <curation output> --output {where} --rebuild, or train on "
                            "the curation output itself")
    log.info("training from latent cache %s (%d entries; VAE encoded in %s, text in %s)", where,
             manifest["entries"], built["vae"]["dtype"], built["text_encoder"]["dtype"])


# ----------------------------------------------------------------------------------- building
class _Builder:
    """The models and plan of one rank's cache build."""

    def __init__(self, cfg: TrainConfig, store: Store, d: Dist):
        from training.tasks import build_vae, load_text_encoder_from, sync_loader

        self.cfg, self.store, self.d = cfg, store, d
        self.tokenizer, self.text_encoder, self.text_dim = load_text_encoder_from(cfg, d.device)
        vae, self.vae_ref = build_vae(cfg, Path("."), d, trainable=False, save_untrained=False)
        if cfg.vae.untrained:
            self.vae_ref = {"source": "spacetime", "untrained": True, "init_seed": cfg.vae.init_seed}
        self.vae_fp = vae_fingerprint(vae)
        dtype = _resolved_dtype(cfg.vae.dtype, d.device)
        self.vae_dtype = getattr(torch, dtype)
        self.vae = vae.to(d.device, self.vae_dtype).eval().requires_grad_(False)
        self.cfg = cfg = sync_loader(cfg, vae.temporal_compression, vae.spatial_compression, tuple(cfg.dit.patch))
        self.samples: Samples = read_index(cfg.loader.data, cfg.loader.s3)
        if self.samples.cached:
            raise ConfigError(f"{cfg.loader.data}: already a latent cache; give the curation output")
        self.specs = {s.name: s for s in bucket_specs(self.samples, cfg.loader)}
        if cfg.loader.packing:  # each clip at its native size (training.data.packing)
            from training.data.packing import native_shapes

            self.native = native_shapes(self.samples, cfg.loader)
        self.key = cache_key(cfg, self.vae_fp, text_encoder_fingerprint(cfg.text_encoder.path), self.text_dim,
                             d.device)
        self.digest = key_digest(self.key)
        n, per = len(self.samples), cfg.cache.entries_per_shard
        self.units = [range(u * per, min(n, (u + 1) * per)) for u in range(-(-n // per))]

    def manifest(self, state: str, **extra) -> dict:
        return {"format": contract.CACHE_FORMAT, "state": state, "key": self.key, "key_digest": self.digest,
                "data": self.cfg.loader.data, "data_fingerprint": self.samples.fingerprint,
                "entries_per_shard": self.cfg.cache.entries_per_shard, "units": len(self.units),
                "latent_channels": self.vae.latent_channels,
                "compression": [self.vae.temporal_compression, self.vae.spatial_compression],
                "text_dim": self.text_dim, "max_length": self.cfg.text_encoder.max_length,
                "vae": self.vae_ref, "text_encoder_path": self.cfg.text_encoder.path, **extra}

    # ---- one entry
    @torch.no_grad()
    def latent(self, i: int, reader: contract.ShardReader) -> tuple[np.ndarray, contract.CacheEntry]:
        s = self.samples
        spec = self.specs[s.bucket[i]]
        if self.cfg.loader.packing:
            n = self.native
            spec = dataclasses.replace(spec, frames=int(n.frames[i]), size=(int(n.width[i]), int(n.height[i])))
        parts = reader.read(s.shard[i], s.key[i])
        record = contract.read_record(parts, where=s.shard[i])
        frames, cropped, stride = sample_frames(parts, record, float(s.fps[i]), int(s.num_frames[i]), spec.frames,
                                                spec.size, self.cfg.loader)
        video = to_unit_range(torch.from_numpy(frames[None])).to(self.d.device, self.vae_dtype)
        mean, logvar = self.vae.posterior(video)
        latent = torch.stack([mean[0], logvar[0]]).float().cpu().numpy()
        short = record.short_caption or None
        entry = contract.CacheEntry(
            clip_id=s.clip_id[i], bucket=spec.name, size=spec.size, frames=spec.frames, stride=stride,
            fps=float(s.fps[i]) / stride, cropped=cropped, dense_caption=record.dense_caption, short_caption=short,
            entry=entry_address(self.digest, s.clip_id[i], spec.name, spec.size, spec.frames, stride,
                                record.dense_caption, short),
            text_tokens=0, short_tokens=None)
        return latent, entry

    def encode_texts(self, prompts: list[str]) -> list[np.ndarray]:
        """Each prompt's unmasked encoder rows [n, D] (in chunks, in order: deterministic)."""
        from training.text_encoder import encode_text

        out = []
        for k in range(0, len(prompts), self.cfg.cache.text_batch):
            hidden, mask = encode_text(self.tokenizer, self.text_encoder, prompts[k:k + self.cfg.cache.text_batch],
                                       self.cfg.text_encoder.max_length)
            for h, m in zip(hidden, mask):
                n = int(m.sum())
                if not bool(m[:n].all()):
                    raise ValueError("the tokenizer pads on the left; the cache stores the first n rows")
                out.append(h[:n].numpy().astype(np.float32))
        return out

    # ---- one unit
    def build_unit(self, u: int, reader: contract.ShardReader) -> dict:
        s = self.samples
        done: list[tuple[np.ndarray, contract.CacheEntry, int]] = []
        errors = []
        for i in self.units[u]:
            try:
                latent, entry = self.latent(i, reader)
                done.append((latent, entry, i))
            except Exception as err:  # the clip's own fault: recorded, left out; the run goes on
                if is_infrastructure(err):  # out of memory, a lost store...: not the clip's fate. The unit
                    raise  # stays unbuilt (no record), the build fails, and its rerun builds the unit.
                errors.append({"clip_id": s.clip_id[i], "shard": s.shard[i], "error": describe(err)})
                log.error("clip %s of %s not cached: %s", s.clip_id[i], s.shard[i], describe(err))
        dense = self.encode_texts([e.dense_caption for _, e, _ in done])
        shorts = self.encode_texts([e.short_caption for _, e, _ in done if e.short_caption])
        rel = contract.cache_shard_path(u)
        members, rows, k = [], [], 0
        for (latent, entry, i), text in zip(done, dense):
            member = {"__key__": entry.clip_id, contract.LATENT_EXT: npy_bytes(latent),
                      contract.TEXT_EXT: npy_bytes(text)}
            entry.text_tokens = len(text)
            if entry.short_caption:
                member[contract.SHORT_TEXT_EXT] = npy_bytes(shorts[k])
                entry.short_tokens = len(shorts[k])
                k += 1
            member[contract.ENTRY_EXT] = entry.model_dump_json().encode()
            members.append(member)
            rows.append({"shard": rel, "key": entry.clip_id, "clip_id": entry.clip_id, "bucket": entry.bucket,
                         "width": int(s.width[i]), "height": int(s.height[i]), "num_frames": int(s.num_frames[i]),
                         "fps": float(s.fps[i]), "stride": entry.stride, "entry": entry.entry,
                         "source_shard": s.shard[i], "source_digest": s.source[i]})
        if members:
            with self.store.writing(rel) as tmp:
                contract.write_tar(tmp, members)
        record = {"unit": u, "rows": rows, "errors": errors}
        self.store.write(contract.cache_unit_record(u), json.dumps(record, sort_keys=True))
        return record


def _check_output(b: _Builder, rebuild: bool) -> tuple[dict | None, str]:
    """Compare the output with this build (read-only; every rank): (its manifest, what to do:
    "done" (complete and current), "resume", "start" or "restart" (--rebuild of another key))."""
    store = b.store
    existing = json.loads(store.read_bytes(contract.CACHE_MANIFEST)) if contract.is_cache(store) else None
    if existing is None:
        if store.list(contract.CACHE_UNITS_DIR, ".json"):
            raise CacheMismatch(f"{store.uri}: unit records without cache.json; not a cache this code wrote")
        return None, "start"
    same = (existing.get("key_digest") == b.digest and existing.get("data_fingerprint") == b.samples.fingerprint
            and existing.get("entries_per_shard") == b.cfg.cache.entries_per_shard)
    if same:
        return existing, "done" if existing["state"] == "complete" else "resume"
    if rebuild:
        return existing, "restart"
    diffs = key_differences(existing.get("key", {}), b.key)
    if existing.get("data_fingerprint") != b.samples.fingerprint:
        diffs.append(f"data: {existing.get('data')} ({existing.get('data_fingerprint')}) vs "
                     f"{b.cfg.loader.data} ({b.samples.fingerprint})")
    if existing.get("entries_per_shard") != b.cfg.cache.entries_per_shard:
        diffs.append(f"cache.entries_per_shard: {existing.get('entries_per_shard')} vs {b.cfg.cache.entries_per_shard}")
    raise CacheMismatch(f"{store.uri} is a latent cache built differently ({'; '.join(diffs)}): add --rebuild to "
                        "replace it, or give another --output")


def _start(b: _Builder, action: str) -> None:
    """Rank 0: (after removing a cache of another key) write the manifest in state building."""
    store = b.store
    if action == "restart":
        log.warning("%s: --rebuild: removing the cache built with another key", store.uri)
        for rel in (contract.CACHE_MANIFEST, contract.CACHE_INDEX, contract.CACHE_NULL_TEXT):
            store.delete(rel)
        store.delete_dir(contract.SHARDS_DIR)
        store.delete_dir(contract.WORK_DIR)
    store.write(contract.CACHE_MANIFEST, json.dumps(b.manifest("building"), indent=1))


def _publish(b: _Builder) -> dict:
    """Rank 0, every unit recorded: index.parquet, null_text.npy, then cache.json (complete)."""
    import pyarrow.parquet as pq

    store = b.store
    rows, errors = [], []
    for u in range(len(b.units)):
        record = json.loads(store.read_bytes(contract.cache_unit_record(u)))
        rows += record["rows"]
        errors += record["errors"]
    with store.writing(contract.CACHE_INDEX) as tmp:
        pq.write_table(contract.table(rows, contract.CACHE_INDEX_SCHEMA), tmp)
    store.write(contract.CACHE_NULL_TEXT, npy_bytes(b.encode_texts([""])[0]))
    manifest = b.manifest("complete", entries=len(rows), errors=len(errors), error_list=errors[:100])
    store.write(contract.CACHE_MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def build_cache(cfg: TrainConfig, data: list[str] | None, output: str, rebuild: bool = False) -> dict:
    """Build (or finish, or check) the latent cache of `data` at `output`; every rank of a torchrun
    job calls it. Returns cache.json's content."""
    from tqdm import tqdm

    if data:
        cfg = cfg.model_copy(update={"loader": cfg.loader.model_copy(update={"data": [str(x) for x in data]})})
    d = init_distributed(cfg.parallel)
    if d.device.type == "cuda":  # the same bytes on every run: deterministic kernels, no autotuning
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    try:
        b = _Builder(cfg, Store(output, cfg.loader.s3), d)
        existing, action = _check_output(b, rebuild)
        if action == "done":
            log.info("%s: the cache is complete and current (%d entries); nothing to do", output, existing["entries"])
            return existing
        if d.enabled:
            dist.barrier()  # every rank has read the output before rank 0 changes it
        if d.is_main and action in ("start", "restart"):
            _start(b, action)
        if d.enabled:
            dist.barrier()
        done = {int(n.split(".")[0]) for n in b.store.list(contract.CACHE_UNITS_DIR, ".json")}
        mine = [u for u in range(len(b.units)) if u % d.world_size == d.rank and u not in done]
        log.info("cache %s: %d clips in %d units; %d already built, %d for this rank", output, len(b.samples),
                 len(b.units), len(done), len(mine))
        with contract.ShardReader(cfg.loader.s3) as reader:
            for u in tqdm(mine, desc="cache", unit="unit", disable=not (d.is_main and cfg.log.progress) or None):
                b.build_unit(u, reader)
        if d.enabled:
            dist.barrier()
        manifest = _publish(b) if d.is_main else None
        if d.enabled:
            dist.barrier()
        return manifest or json.loads(b.store.read_bytes(contract.CACHE_MANIFEST))
    finally:
        if d.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def cmd_cache(args: argparse.Namespace) -> int:
    cfg = load_config(TrainConfig, args.config, args.overrides)
    if args.output is None:
        raise ConfigError("spacetime train cache: give --output CACHE")
    manifest = build_cache(cfg, args.data, str(args.output), rebuild=args.rebuild)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"latent cache {args.output}: {manifest['entries']} entries in {manifest['units']} units, "
              f"{manifest['errors']} clips failed")
    return 0
