"""Codebook fine-tuning: train a quantised task's centroids with its own data (issue 13).

After k-means (Algorithm 2) every owned weight holds a code into its layer's codebook. Deep
Compression §3 then trains the *centroids* while each weight keeps its code: the gradient of a
centroid is the sum of the gradients of the weights that share it, so the network keeps the
same number of distinct values (the same bits per weight) but they move to where the task's
loss wants them. Run before Algorithm 3's acceptance test, it lets narrower widths pass.

By default only the centroids train and the task's head stays as TRAIN left it. With
``quantize.finetune_head`` the task's own float tensors (the head, a conv net's normalisation
affine parameters; never the running statistics) train with them: they are the task's private
float32 parameters, stored outside the packed words and outside eq. 10's count, so letting
them adapt to the quantised features costs no bit (Deep Compression §3 retrains every
remaining float parameter with the shared weights). By default
(``quantize.finetune_target: float``) they fit the float network's own softmax on the training
inputs (KL divergence, a distillation from the network being quantised), not the labels: TRAIN
already drove the training loss to about 0.002, so fitting the labels further mostly overfits.
Measured by ``bench/codebook_targets.py`` (the first p-MNIST task of the paper configuration,
validation figures only; ``bench/results/codebook_targets-cpu.json``): the float network has
97.80 % accuracy and loss 0.0939; without fine-tuning the loss criterion accepted 6 bits; one
epoch at lr 1e-4 was accepted at 4 bits with either target, the float target keeping 97.78 % and
loss 0.0950, the labels 97.72 % and 0.1008; the float target at lr 1e-3 kept 97.73 % and 0.1014.
Nothing another task uses can move: shared weights are buffers of the net (read-only,
TinySubNets) and the other tasks' words are not in the net.

Training runs in evaluation mode: batch-norm layers keep the running statistics TRAIN left
(they are what the model file stores and what inference uses) and dropout is off, so the
result depends on the seed, the task, the width and the data only. Adam, because a centroid's
summed gradient scales with how many weights share it (from a handful to thousands), which
plain SGD would turn into steps of very different size; batch order is keyed by
(seed, task, "codebook", epoch), the same for every width tried. The centroid gradients are
summed with ``index_add_``, which is deterministic on the CPU and, on CUDA, under the
deterministic-algorithms mode that :func:`qpacknet.devices.configure` turns on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qpacknet.nets import PopulationNet
from qpacknet.quantize import Codebook
from qpacknet.scenarios.base import Split
from qpacknet.seeding import generator


def tune_codebooks(
    net: PopulationNet,
    books: dict[str, Codebook],
    masks: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    train: Split,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    task: int,
    targets: torch.Tensor | None = None,
    head: bool = False,
) -> tuple[dict[str, Codebook], dict[str, torch.Tensor]]:
    """Fine-tune ``books``' centroids (codes fixed) on ``train`` for ``epochs`` in slot 0 of
    ``net`` (a K=1 net holding the task's shared weights, if any), with the task tensors
    ``state`` (head, normalisation) fixed.

    The loss is the cross-entropy with the labels, or, with ``targets`` (the float network's
    logits on ``train``, ``[N, C]``), the KL divergence from the float network's softmax to the
    quantised one's: the centroids then move to give back the float network's function instead
    of fitting the training labels further.

    With ``head``, the task's trainable tensors in ``state`` (the parameters among
    ``net.task_param_names``) train too, from ``state``'s values, with the same optimiser.

    Returns the tuned codebooks (float32 centroids on the CPU, the same codes) and the task
    tensors (``state``'s values, on the CPU, with the trained ones replaced when ``head``).
    ``net``'s slot 0 is left holding the tuned network.
    """
    device = next(net.parameters()).device
    dense, index, codes, centroids = {}, {}, {}, {}
    for spec in net.layer_specs:
        name = spec.name
        mask = masks[name].to(device)
        index[name] = mask.reshape(-1).nonzero().squeeze(1)
        codes[name] = books[name].codes.to(device)
        centroids[name] = books[name].centroids.to(device).clone().requires_grad_(True)
        w = torch.zeros(spec.shape, device=device)
        w.view(-1)[index[name]] = books[name].centroids.to(device)[codes[name]]
        dense[name] = w
    net.load_candidate(0, dense, masks, state)
    trained = [n for n in net.task_param_names if head and n.replace(".", "_") in net.task_params]
    params = list(centroids.values()) + [net.task_params[n.replace(".", "_")] for n in trained]
    opt = torch.optim.Adam(params, lr=lr)
    was_training = net.training
    net.eval()
    n = len(train)
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=generator(seed, "batches", task, "codebook", epoch))
        perm = perm.to(device)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            out = net(train.inputs(idx))[0]
            if targets is None:
                loss = F.cross_entropy(out, train.y[idx])
            else:
                want = F.log_softmax(targets[idx], dim=-1)
                got = F.log_softmax(out, dim=-1)
                loss = F.kl_div(got, want, log_target=True, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            net.zero_grad(set_to_none=True)
            loss.backward()
            for spec in net.layer_specs:
                name = spec.name
                grad = net.theta(name).grad
                g = torch.zeros_like(centroids[name])
                if grad is not None and index[name].numel():
                    g.index_add_(0, codes[name], grad[0].reshape(-1)[index[name]])
                centroids[name].grad = g
            opt.step()
            with torch.no_grad():
                for spec in net.layer_specs:
                    name = spec.name
                    theta = net.theta(name)[0].view(-1)
                    theta[index[name]] = centroids[name][codes[name]]
    net.train(was_training)
    net.zero_grad(set_to_none=True)
    tuned = {
        name: Codebook(c.detach().to("cpu", torch.float32).contiguous(), books[name].codes)
        for name, c in centroids.items()
    }
    task_state = {k: v.detach().cpu().clone() for k, v in state.items()}
    for name in trained:
        task_state[name] = net.task_param(name)[0].detach().to("cpu").clone()
    return tuned, task_state
