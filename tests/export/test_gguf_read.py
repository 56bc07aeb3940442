"""lorakit's GGUF header reader against the gguf package's GGUFReader (metadata, tensor table, dequantized data)."""

import numpy as np
import pytest

from lorakit.export import export_gguf
from lorakit.export.gguf_read import GGUFFile

pytest.importorskip("gguf")


def test_reader_matches_gguf_reader(tiny_dir, tmp_path):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    out = export_gguf(tiny_dir, tmp_path / "q.gguf", outtype="q8_0", progress=False, echo=None)
    ours, ref = GGUFFile(out), GGUFReader(out)
    assert ours.metadata.keys() == {k for k in ref.fields if not k.startswith("GGUF.")}
    for key, value in ours.metadata.items():
        want = ref.fields[key].contents()
        assert value == pytest.approx(want) if isinstance(want, float) else value == want, key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for info, t in zip(ours.tensors, ref.tensors, strict=True):
        want = dequantize(t.data, t.tensor_type).reshape(info.shape)
        np.testing.assert_array_equal(ours.dequantized(info, chunk=64), want, err_msg=info.name)
