"""Training recipes: `official` is the paper's training unchanged; `fast` adds training-only accelerators, each also
behind its own flag, that leave the trained model an official DETR (same architecture, state-dict keys and shapes,
inference path).

- query_groups K (Group DETR, Chen et al. 2022, arXiv 2207.13085): K groups of num_queries learned queries in
  training, self-attention within each group, one-to-one matching per group, the groups' losses summed. More
  positive (matched) queries per target and step, without the duplicates a one-to-many assignment would teach the
  shipped queries: group 0 is the official model.
- dense_aux_coef W (Co-DETR's collaborative one-to-many assignment, Zong et al. 2023, arXiv 2211.12860, in its
  simplest form): a dense head on the encoder output, every token inside an object trained to its class and box,
  its losses weighted W times DETR's; discarded after training (fastdetr.dense_aux).
- dn_box_noise LAMBDA (DN-DETR, Li et al. 2022, arXiv 2203.01305, for DETR's content-free queries): noised
  target boxes as extra positional queries with a fixed assignment, trained to reconstruct their targets
  (fastdetr.denoising); a stable learning signal while the matching is still unstable.
- ema_decay D: the exponential moving average of the weights is evaluated, kept and shipped (fastdetr.ema), as
  modern DETR trainers do; the same architecture and keys.

`fast` holds what was measured not to slow convergence on the shapes demo (500 images, 10 epochs, seeds 0 and 1;
benchmarks/RESULTS.md, "Time to accuracy"): the dense head and the weight average. Query groups (K = 3 and 11) and
denoising queries ended 0.08-0.10 AP50 below `official` there and are off in it; they stay available as flags.
`official` stays the default: `fast` has not reached the issue's targets (half the epochs to official's AP50).

A flag given on the command line wins over the recipe; `resolve_recipe` fills in the ones left unset (None).
"""
import argparse

RECIPES = {
    "official": {"query_groups": 1, "dense_aux_coef": 0.0, "dn_box_noise": 0.0, "ema_decay": 0.0},
    "fast": {"query_groups": 1, "dense_aux_coef": 1.0, "dn_box_noise": 0.0, "ema_decay": 0.99},
}


def resolve_recipe(args: argparse.Namespace) -> argparse.Namespace:
    """Set every accelerator setting that is None in args from RECIPES[args.recipe]; returns args."""
    recipe = getattr(args, "recipe", None) or "official"
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    args.recipe = recipe
    for key, value in RECIPES[recipe].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args
