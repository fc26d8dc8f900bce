"""The maths of every algorithm, as pure functions of tensors, in one home: per-token
log-probs and means (tokens), policy losses and the value loss (policy), advantage
estimators and reward shaping (advantages), preference losses (preference). Policy losses
and advantage estimators are registered by name; the config's choices name them."""

from .advantages import ADVANTAGES, AdvantageInputs, Advantages
from .policy import POLICY_LOSSES, LossSpec
from .tokens import Normaliser

__all__ = ["ADVANTAGES", "POLICY_LOSSES", "AdvantageInputs", "Advantages", "LossSpec", "Normaliser"]
