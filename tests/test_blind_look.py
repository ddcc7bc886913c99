"""scripts/blind_look.py: the sealed key must say which cells are real, and the score must read it right."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import genlab.run_dir
from scripts import blind_look



class WhiteDigits:
    """A 'generator' whose every sample is all white: no real digit is, so the grid shows which cell is which."""

    def sample(self, n, seed, class_label):
        return torch.ones(n, 1, 16, 16)


def test_the_key_names_exactly_the_generated_cells(tmp_path, monkeypatch):
    cfg = OmegaConf.create({"data": {"_target_": "genlab.data.digits.Digits", "image_size": 16, "channels": 1, "num_classes": 10}})
    monkeypatch.setattr(genlab.run_dir, "load_family", lambda run: (WhiteDigits(), cfg))
    blind_look.make(tmp_path / "run", tmp_path / "blind", per_class=6, seed=3)
    key = json.loads((tmp_path / "blind" / "key.json").read_text())["cells"]
    grid = np.asarray(Image.open(tmp_path / "blind" / "blind.png"), dtype=np.int32)
    cell = blind_look.CELL
    for row in range(6):
        for col in range(10):
            top, left = blind_look.MARGIN + row * cell + 1, blind_look.MARGIN + col * cell + 1
            white = (grid[top:top + cell - 2, left:left + cell - 2] == 255).all()
            assert white == (key[f"{row},{col}"] == "generated"), (row, col)
    for col in range(10):  # half of each column is real
        assert sum(key[f"{row},{col}"] == "real" for row in range(6)) == 3
    # Shuffled per column: the generated cells are not always the bottom half.
    assert any(key[f"0,{col}"] == "generated" for col in range(10))


def test_score_counts_doubtful_cells_per_kind_and_guesses(tmp_path):
    cells = {"0,0": "real", "1,0": "generated", "0,1": "generated", "1,1": "real"}
    (tmp_path / "key.json").write_text(json.dumps({"run": "r", "seed": 0, "per_class": 2, "cells": cells}))
    side = blind_look.MARGIN + 2 * blind_look.CELL
    Image.new("L", (side, side), 0).save(tmp_path / "blind.png")
    result = blind_look.score(tmp_path, doubtful=["0,0", "1,0", "0,1"], generated=["1,0", "1,1"])
    assert result["real"]["doubtful"] == 1 and result["real"]["doubtful_rate"] == 0.5
    assert result["generated"]["doubtful"] == 2 and result["generated"]["doubtful_cells"] == ["0,1", "1,0"]
    assert result["guessed_generated"] == {"guesses": 2, "correct": 1, "chance": 0.5}
    revealed = np.asarray(Image.open(tmp_path / "revealed.png"))
    for name, kind in cells.items():  # a red frame round the generated cells only
        row, col = map(int, name.split(","))
        corner = revealed[blind_look.MARGIN + row * blind_look.CELL, blind_look.MARGIN + col * blind_look.CELL]
        assert (corner[0] > 200 and corner[1] < 100) == (kind == "generated"), name
    with pytest.raises(SystemExit, match="not on the grid"):
        blind_look.score(tmp_path, doubtful=["9,9"], generated=[])
