"""The official command-line arguments and `build_model`, which builds exactly the official structure."""
import argparse

import torch

from .backbone import NORMS, RESNETS, build_backbone
from .criterion import SetCriterion
from .detr import DETR
from .matcher import build_matcher
from .postprocess import PostProcess
from .recipe import RECIPES, resolve_recipe
from .transformer import build_transformer


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Every argument of the official main.py with its default, plus fastdetr's backbone options."""
    parser = argparse.ArgumentParser("DETR", add_help=add_help)
    train = parser.add_argument_group("training")
    train.add_argument("--lr", default=1e-4, type=float, help="learning rate of the transformer and heads (AdamW)")
    train.add_argument("--lr_backbone", default=1e-5, type=float,
                       help="learning rate of the backbone; 0 freezes it")
    train.add_argument("--batch_size", default=2, type=int, help="images per step and process")
    train.add_argument("--weight_decay", default=1e-4, type=float, help="AdamW weight decay")
    train.add_argument("--epochs", default=300, type=int, help="epochs to train in all (a resumed run included)")
    train.add_argument("--lr_drop", default=200, type=int, help="epochs between the 10x learning-rate drops")
    train.add_argument("--clip_max_norm", default=0.1, type=float, help="gradient clipping max norm (0: none)")

    model = parser.add_argument_group("model (taken from the checkpoint on --resume, --finetune and --eval)")
    model.add_argument("--backbone", default="resnet50", type=str, choices=RESNETS, help="torchvision ResNet")
    model.add_argument("--dilation", action="store_true",
                       help="replace the stride of the last block by a dilation (DC5; resnet50/101)")
    model.add_argument("--position_embedding", default="sine", type=str, choices=("sine", "learned"),
                       help="position encoding of the image features")
    model.add_argument("--enc_layers", default=6, type=int, help="transformer encoder layers")
    model.add_argument("--dec_layers", default=6, type=int, help="transformer decoder layers")
    model.add_argument("--dim_feedforward", default=2048, type=int, help="width of the transformer's FFN")
    model.add_argument("--hidden_dim", default=256, type=int, help="width of the transformer (embeddings)")
    model.add_argument("--dropout", default=0.1, type=float, help="dropout in the transformer")
    model.add_argument("--nheads", default=8, type=int, help="attention heads")
    model.add_argument("--num_queries", default=100, type=int,
                       help="object queries: the most objects detected in one image")
    model.add_argument("--pre_norm", action="store_true", help="LayerNorm before each sublayer instead of after")
    model.add_argument("--backbone_norm", default="frozen", choices=NORMS,
                       help="'frozen' is the official FrozenBatchNorm2d; 'batch' trains BatchNorm (from scratch)")
    model.add_argument("--train_backbone_stem", action="store_true",
                       help="also train conv1 and layer1 of the backbone (officially frozen; from scratch they "
                            "otherwise keep their random weights)")
    model.add_argument("--pretrained_backbone", action="store_true",
                       help="start the backbone from torchvision's ImageNet weights (as the official code does)")
    model.add_argument("--num_classes", default=None, type=int,
                       help="largest class id + 1 (default: the dataset's largest category id + 1)")

    loss = parser.add_argument_group("loss")
    loss.add_argument("--no_aux_loss", dest="aux_loss", action="store_false",
                      help="no losses on the outputs of the intermediate decoder layers")
    loss.add_argument("--set_cost_class", default=1, type=float, help="class weight in the matching cost")
    loss.add_argument("--set_cost_bbox", default=5, type=float, help="L1 box weight in the matching cost")
    loss.add_argument("--set_cost_giou", default=2, type=float, help="GIoU weight in the matching cost")
    loss.add_argument("--bbox_loss_coef", default=5, type=float, help="weight of the L1 box loss")
    loss.add_argument("--giou_loss_coef", default=2, type=float, help="weight of the GIoU loss")
    loss.add_argument("--eos_coef", default=0.1, type=float, help="weight of the no-object class")

    fast = parser.add_argument_group("training recipe (training only: the model trained is an official DETR)")
    fast.add_argument("--recipe", default="official", choices=tuple(RECIPES),
                      help="official: the paper's training; fast: the training-only accelerators below on their "
                           "recipe values (fastdetr.recipe); a flag given explicitly wins")
    fast.add_argument("--query_groups", default=None, type=int, metavar="K",
                      help="Group DETR: K groups of --num_queries queries in training, self-attention within a "
                           "group, one-to-one matching per group; evaluation and the saved model use group 0 only "
                           "(default: the recipe's; official 1, fast %d)" % RECIPES["fast"]["query_groups"])
    fast.add_argument("--dense_aux_coef", default=None, type=float, metavar="W",
                      help="weight of a training-only dense head on the encoder output (every token inside an object "
                           "predicts its class and box; fastdetr.dense_aux), 0: none; its losses are weighted like "
                           "DETR's (W x 1, W x --bbox_loss_coef, W x --giou_loss_coef) and it is not in the saved "
                           "model (default: the recipe's; official 0, fast %g)" % RECIPES["fast"]["dense_aux_coef"])
    fast.add_argument("--dn_box_noise", default=None, type=float, metavar="LAMBDA",
                      help="denoising queries (DN-DETR): in training, the targets' boxes with this much noise (centre "
                           "shift up to LAMBDA x half the size, size scaled by 1 +- LAMBDA) are extra positional "
                           "queries trained to reconstruct their box and class (fastdetr.denoising); 0: none "
                           "(default: the recipe's; official 0, fast %g)" % RECIPES["fast"]["dn_box_noise"])
    fast.add_argument("--ema_decay", default=None, type=float, metavar="D",
                      help="evaluate, keep as the best model and ship an exponential moving average of the weights "
                           "(fastdetr.ema; decay D after a warm-up); 0: the weights themselves (default: the "
                           "recipe's; official 0, fast %g)" % RECIPES["fast"]["ema_decay"])

    data = parser.add_argument_group("data and run")
    data.add_argument("--coco_path", type=str,
                      help="dataset folder in the COCO layout (train2017/, val2017/, annotations/) or Roboflow's "
                           "(train/, valid/ with _annotations.coco.json); none: the synthetic demo")
    data.add_argument("--output_dir", default="", help="where to save; empty for no saving")
    data.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                      help="cpu, cuda, cuda:1, ...")
    data.add_argument("--seed", default=42, type=int, help="random seed (each process adds its rank)")
    data.add_argument("--resume", default="", help="continue the run of this checkpoint (path or URL)")
    data.add_argument("--start_epoch", default=0, type=int, metavar="N",
                      help="first epoch (set from the checkpoint on --resume)")
    data.add_argument("--eval", action="store_true", help="only evaluate the --resume checkpoint")
    data.add_argument("--num_workers", default=2, type=int, help="data loader processes (0: load in the main one)")
    data.add_argument("--dist_url", default="env://", help="how torchrun's processes meet (torch.distributed)")

    unused = parser.add_argument_group("official flags without effect here (accepted so that official command "
                                       "lines run)")
    unused.add_argument("--frozen_weights", type=str, default=None,
                        help="segmentation training from a detection model: not supported (refused)")
    unused.add_argument("--masks", action="store_true", help="segmentation head: not supported (refused)")
    unused.add_argument("--mask_loss_coef", default=1, type=float, help="segmentation loss weight: unused")
    unused.add_argument("--dice_loss_coef", default=1, type=float, help="segmentation loss weight: unused")
    unused.add_argument("--dataset_file", default="coco",
                        help="only COCO-format detection data is read; other values only change the default "
                             "class count of build_model")
    unused.add_argument("--coco_panoptic_path", type=str, help="panoptic data: unused")
    unused.add_argument("--remove_difficult", action="store_true", help="(a Pascal VOC option upstream): unused")
    unused.add_argument("--world_size", default=1, type=int,
                        help="unused: torchrun's WORLD_SIZE gives the number of processes")
    return parser


def default_args(**overrides) -> argparse.Namespace:
    """The official arguments with their defaults (device: cuda when available, else cpu), then `overrides`."""
    args = get_args_parser().parse_args([])
    for key, value in overrides.items():
        if not hasattr(args, key):
            raise TypeError(f"default_args got an unknown argument {key!r}")
        setattr(args, key, value)
    return args


def num_classes_for(args) -> int:
    """The official rule (91 for COCO, 250 for COCO panoptic, else 20) unless args.num_classes is set."""
    if getattr(args, "num_classes", None) is not None:
        return args.num_classes
    if args.dataset_file == "coco_panoptic":
        return 250
    return 91 if args.dataset_file == "coco" else 20


def build_model(args):
    """Returns (model, criterion, postprocessors) like the official build; the criterion is moved to args.device.
    Accelerator settings left None (query_groups, dense_aux_coef, dn_box_noise, ema_decay) are first set from
    args.recipe (fastdetr.recipe)."""
    if args.masks or args.frozen_weights is not None:
        raise ValueError("the segmentation head (--masks / --frozen_weights) is not supported by fastdetr")
    device = torch.device(args.device)
    num_classes = num_classes_for(args)
    resolve_recipe(args)
    model = DETR(build_backbone(args), build_transformer(args), num_classes=num_classes,
                 num_queries=args.num_queries, aux_loss=args.aux_loss, query_groups=args.query_groups,
                 dense_head=args.dense_aux_coef > 0, dn_box_noise=args.dn_box_noise)
    weight_dict = {"loss_ce": 1, "loss_bbox": args.bbox_loss_coef, "loss_giou": args.giou_loss_coef}
    if args.aux_loss:
        weight_dict.update({f"{k}_{i}": v for i in range(args.dec_layers - 1) for k, v in list(weight_dict.items())})
    if args.dn_box_noise > 0:  # the denoising slots' losses, weighted as the official ones
        weight_dict.update({k.replace("loss_", "loss_dn_", 1): v for k, v in list(weight_dict.items())})
    if args.dense_aux_coef > 0:
        weight_dict.update({f"loss_dense_{k[5:]}": args.dense_aux_coef * weight_dict[k]
                            for k in ("loss_ce", "loss_bbox", "loss_giou")})
    criterion = SetCriterion(num_classes, matcher=build_matcher(args), weight_dict=weight_dict,
                             eos_coef=args.eos_coef, losses=["labels", "boxes", "cardinality"])
    criterion.to(device)
    return model, criterion, {"bbox": PostProcess()}
