"""The nnx normalization layers, built from their descriptions.

Each class takes the fields, call arguments and variables of its
:mod:`jaxnorm._description` entry (those of its ``flax.nnx`` namesake,
where flax has one) and calls the functional core for every number it
returns.
"""

from jaxnorm import _description as d
from jaxnorm.nnx._build import build

BatchNorm = build(d.BATCH_NORM)
LayerNorm = build(d.LAYER_NORM)
RMSNorm = build(d.RMS_NORM)
GroupNorm = build(d.GROUP_NORM)
InstanceNorm = build(d.INSTANCE_NORM)
FilterResponseNorm = build(d.FILTER_RESPONSE_NORM)
SwitchableNorm = build(d.SWITCHABLE_NORM)
BatchRenorm = build(d.BATCH_RENORM)
MovingAverageBatchNorm = build(d.MOVING_AVERAGE_BATCH_NORM)
EvoNormB0 = build(d.EVONORM_B0)
EvoNormS0 = build(d.EVONORM_S0)
