"""`config.init_from` into a model with LoRA adapters: LoRA is no architecture difference; a plain params
export fills the base weights exactly, and the adapters keep their initialisation (B = 0) and are named."""

from __future__ import annotations

import numpy as np

from jclip import parallel
from jclip.build import TrainSetup
from jclip.convert import params_io
from jclip.init_from import initial_params
from jclip_testing import micro_config

LORA = {"rank": 2, "alpha": 1.0, "targets": ("attention", "mlp", "patch_embedding")}


def test_a_plain_export_fills_a_lora_models_base_weights(tmp_path) -> None:
    plain = micro_config()
    abstract = params_io.flatten(params_io.abstract_params(plain.model))
    rng = np.random.default_rng(3)
    source = {path: rng.standard_normal(x.shape).astype(x.dtype) for path, x in abstract.items()}
    model_config = params_io.plain_model_config(plain.model)
    assert "lora" not in model_config  # rank 0 is no LoRA
    params_io.write(tmp_path / "export", params_io.HostModel(model_config, source, params_io.preprocessing_spec(model_config)),
                    {"test": True})

    config = micro_config(init_from=str(tmp_path / "export"))
    config.model.lora = LORA
    setup = TrainSetup.create(config, parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}))
    fresh = setup.init_state()["params"]
    params, kept = initial_params(config, setup, fresh)

    flat, fresh_flat = params_io.flatten(params), params_io.flatten(fresh)
    adapters = sorted("/".join(map(str, path)) for path in fresh_flat if "lora_" in str(path[-1]))
    assert kept == adapters and len(adapters) == 2 * 8 + 2  # one block per tower, 8 factors each; the patch pair
    for path, value in source.items():
        np.testing.assert_array_equal(np.asarray(flat[path]), value)
    for path, value in fresh_flat.items():
        if "lora_" in str(path[-1]):
            np.testing.assert_array_equal(np.asarray(flat[path]), np.asarray(value))
            assert np.asarray(value).any() != str(path[-1]).endswith("lora_b"), path  # A drawn, B zero
            assert flat[path].sharding == value.sharding
