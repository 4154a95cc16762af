"""The public API: every name in __all__ resolves, and the spine's functions are callable by their names."""
import pytest

import bestcompress as bc


@pytest.mark.parametrize("name", bc.__all__)
def test_every_public_name_resolves(name):
    assert getattr(bc, name) is not None


def test_distill_and_export_are_callable_although_they_are_subpackages(monkeypatch):
    import bestcompress.distill.trainer as trainer
    import bestcompress.export as export_pkg

    monkeypatch.setattr(trainer, "distill", lambda *a, **k: ("distill", a, k))
    monkeypatch.setattr(export_pkg, "export", lambda *a, **k: ("export", a, k))
    assert bc.distill("s", "t", data="d") == ("distill", ("s", "t"), {"data": "d"})
    assert bc.export("m", "qonnx", "p") == ("export", ("m", "qonnx", "p"), {})
    assert bc.load_recipe("bestformer").name == "bestformer"
