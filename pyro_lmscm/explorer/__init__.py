"""The interactive counterfactual explorer (``pyro-lmscm app``, the optional extra
``pyro-lmscm[app]``): :mod:`.session` computes, :mod:`.render` draws the aligned worlds as
HTML, :mod:`.ui` is the Gradio page. Only :mod:`.ui` imports Gradio."""

from .session import Exploration, Explorer, ExploreRequest, WorldRow

__all__ = ["Exploration", "ExploreRequest", "Explorer", "WorldRow"]
