"""What ``nnUNetv2_ssl_predict_uncertainty`` resolves before predicting: the device and nnU-Net's model folder."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.uncertainty.predict_uncertainty import model_folder_of, select_device


def test_model_folder_is_nnunets_results_folder_of_the_trained_model(synthetic_planned, monkeypatch, tmp_path):
    root = synthetic_planned["root"]
    monkeypatch.setenv("nnUNet_raw", str(root / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(root / "preprocessed"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    expected = str(tmp_path / "Dataset990_SSLSynthetic" / "nnUNetTrainerMEDL__nnUNetPlans__3d_fullres")
    assert model_folder_of("990", "nnUNetTrainerMEDL", "nnUNetPlans", "3d_fullres") == expected
    assert model_folder_of("Dataset990_SSLSynthetic", "nnUNetTrainerMEDL", "nnUNetPlans", "3d_fullres") == expected
    with pytest.raises(SSLInputError, match="dataset 991 not found .* check -d and nnUNet_raw, nnUNet_preprocessed"):
        model_folder_of("991", "nnUNetTrainerMEDL", "nnUNetPlans", "3d_fullres")


def test_select_device(monkeypatch):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert select_device("cpu") == torch.device("cpu")
        assert torch.get_num_threads() == multiprocessing.cpu_count()  # every core, as nnUNetv2_predict
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SSLInputError, match="-device cuda but no CUDA device is available; pass -device cpu"):
        select_device("cuda")
