"""curation.probe reads what it reports while the source is open."""

from __future__ import annotations

import av

import curation.probe as probe_module
from curation.settings import CurateConfig
from spacetime.config import S3Config
from spacetime.standins import testmedia as tm


class _Watched:
    """A PyAV object whose attributes may be read only while its container is open: closing the
    container frees the streams and codec contexts, and a read after that reads freed memory."""

    def __init__(self, target, closed: list[bool], what: str):
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_closed", closed)
        object.__setattr__(self, "_what", what)

    def __getattr__(self, name):
        if self._closed[0]:
            raise AssertionError(f"{self._what}.{name} read after the container was closed")
        value = getattr(self._target, name)
        return _Watched(value, self._closed, "codec_context") if name == "codec_context" else value

    def __setattr__(self, name, value):
        setattr(self._target, name, value)


class _WatchedContainer:
    def __init__(self, container):
        self._container, self._closed = container, [False]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._closed[0] = True
        return self._container.__exit__(*exc)

    @property
    def streams(self):
        if self._closed[0]:
            raise AssertionError("container.streams read after the container was closed")
        streams = self._container.streams
        return type("Streams", (), {"video": [_Watched(s, self._closed, "stream") for s in streams.video],
                                    "audio": streams.audio})()

    def demux(self, stream):
        return self._container.demux(stream._target)

    def decode(self, stream):
        return self._container.decode(stream._target)

    def __getattr__(self, name):
        return getattr(self._container, name)


def test_every_field_is_read_before_the_source_is_closed(monkeypatch):
    """A time base read after the close came out 'None' in one run of 100 sources, and the split
    stage's Fraction('None') then failed the whole run."""
    path = str(tm.real_footage("bikes.mp4"))
    cfg = CurateConfig()
    plain = probe_module.probe(path, cfg.probe, S3Config())
    real_open = av.open
    monkeypatch.setattr(probe_module.av, "open", lambda *a, **k: _WatchedContainer(real_open(*a, **k)))
    watched = probe_module.probe(path, cfg.probe, S3Config())
    assert watched == plain and plain["status"] == "ok" and plain["time_base"] not in (None, "None")


def test_a_remux_has_the_stream_digest_of_its_source_and_a_reencode_does_not(tmp_path):
    """The stream digest is of the coded pictures: a remux into another container (other bytes, other
    file digest) shares it, so it is a duplicate at probe; a re-encode (other pictures) or the same
    pictures under another rotation does not. probe.stream_digest false leaves it out."""
    src = tm.real_footage("bikes.mp4")
    remux = tmp_path / "bikes.mkv"
    tm.remux(src, remux)
    reencoded = tmp_path / "bikes_crf30.mp4"
    tm.transcode(src, reencoded, "libx264", "yuv420p", {"crf": "30"})
    cfg = CurateConfig().probe
    got = {p.name: probe_module.probe(str(p), cfg, S3Config()) for p in (src, remux, reencoded)}
    assert got["bikes.mp4"]["digest"] != got["bikes.mkv"]["digest"]
    assert got["bikes.mp4"]["stream_digest"] == got["bikes.mkv"]["stream_digest"]
    assert got["bikes_crf30.mp4"]["stream_digest"] != got["bikes.mp4"]["stream_digest"]
    assert probe_module.stream_digest(str(src), S3Config(), 90) != got["bikes.mp4"]["stream_digest"]
    assert "stream_digest" not in probe_module.probe(str(src), cfg.model_copy(update={"stream_digest": False}),
                                                     S3Config())
