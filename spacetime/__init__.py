"""spacetime's kernel: the data contract, the clip record, config machinery, atomic I/O, frame helpers
and model references, shared by the three wings (captioner, curation, training) and importing none
of them. `spacetime.cli` (the `spacetime` command) and `spacetime.standins` (tiny random models, test
media, demo samples) sit above the wings and are the only places that may import them."""
