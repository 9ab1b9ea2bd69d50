"""Running work across processes and machines: independent trials on one interface (in process, a
spawned process pool, Ray core tasks, or the trials of a Ray Tune experiment), for the search room
and anything else that fans out.

Ray is optional (``pip install 'secateur[ray]'``) and imported only when the Ray backend runs;
nothing below this room knows Ray.
"""

from __future__ import annotations

from .ray_trials import ray_session  # imports Ray only when called
from .trials import qualified_name, run_trials

__all__ = ["qualified_name", "ray_session", "run_trials"]
