"""GAN family: DCGAN, ResNet (SNGAN-style) or R3GAN networks, five losses, the usual stabilisers.

Phases per optimizer step: `n_critic` discriminator updates ("d") then one generator update ("g").
The package, by concern:
    losses.py        the losses (logits in, scalar out) and the gradient penalties (GP, R1, R2)
    augmentation.py  DiffAugment: colour, translation, cutout, differentiable, on reals and fakes alike
    networks.py      Generator, Discriminator, and `load_generator` for an export
    diagnostics.py   GanDiagnostics: warns when D dominates or samples collapse
    family.py        GAN, the family (configs/model/gan.yaml)
The export (`generator.safetensors` + `generator_config.json`) loads with `load_generator`, which needs
only torch and safetensors. `genlab.families.gan.GAN`, the `_target_` of every saved GAN run, is the
class of family.py.
"""

from genlab.families.gan.augmentation import AUGMENTS, PADDINGS, diff_augment
from genlab.families.gan.diagnostics import GanDiagnostics, pixel_spread
from genlab.families.gan.family import GAN, latent_noise, mode_seeking_ratio, same_class_distance
from genlab.families.gan.losses import (G_LOSSES, LOSSES, d_loss_hinge, d_loss_lsgan, d_loss_nonsaturating, d_loss_rpgan,
                                        d_loss_wgan, g_loss_hinge, g_loss_lsgan, g_loss_nonsaturating, g_loss_rpgan,
                                        g_loss_wgan, gradient_penalty, r1_penalty, r2_penalty)
from genlab.families.gan.networks import ARCHS, R3_BLOCKS, Discriminator, Generator, load_generator

__all__ = ["ARCHS", "AUGMENTS", "GAN", "G_LOSSES", "LOSSES", "PADDINGS", "R3_BLOCKS", "Discriminator", "GanDiagnostics",
           "Generator", "d_loss_hinge", "d_loss_lsgan", "d_loss_nonsaturating", "d_loss_rpgan", "d_loss_wgan",
           "diff_augment", "g_loss_hinge", "g_loss_lsgan", "g_loss_nonsaturating", "g_loss_rpgan", "g_loss_wgan",
           "gradient_penalty", "latent_noise", "load_generator", "mode_seeking_ratio", "pixel_spread", "r1_penalty",
           "r2_penalty", "same_class_distance"]
