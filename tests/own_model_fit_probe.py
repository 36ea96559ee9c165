"""Started by test_own_model.py under torchrun (2 processes, gloo): `fastvae.fit` on the factory
`own_models.flat_vae` and the sprites.

- `own_model_fit_probe.py OUT`: the whole run.
- `own_model_fit_probe.py OUT STEPS`: the run, stopped after STEPS steps (stop_after).
- `own_model_fit_probe.py OUT resume`: resume the run in OUT.

Rank 0 prints the final rows fit returned, as JSON, on its last line.
"""

from __future__ import annotations

import json
import os
import sys

import own_models

import fastvae

OPTIONS = {
    "num_train": 128, "num_test": 32, "image_size": 8, "batch_size": 32, "epochs": 2, "log_every": 3,
    "lr": 3e-3, "device": "cpu", "pictures": False, "model_args": {"width": 12},
}  # fmt: skip

if __name__ == "__main__":
    out, *rest = sys.argv[1:]
    if rest == ["resume"]:
        _, final = fastvae.fit(own_models.flat_vae, "sprites", resume=out, **OPTIONS)
    else:
        stop = {"stop_after": int(rest[0])} if rest else {}
        _, final = fastvae.fit(own_models.flat_vae, "sprites", out=out, **OPTIONS, **stop)
    if os.environ["RANK"] == "0":
        print(json.dumps(final), flush=True)
