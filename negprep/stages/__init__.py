"""The stages of a job, in the order they run (negprep.stages.base has their contract)."""

from negprep.stages.base import Run, Stage
from negprep.stages.batch import Batch
from negprep.stages.cluster import Cluster
from negprep.stages.embed import Embed
from negprep.stages.guide import Guide
from negprep.stages.mine import Mine
from negprep.stages.publish import Publish
from negprep.stages.read import Read
from negprep.stages.search import Search

STAGES: tuple[Stage, ...] = (Read(), Embed(), Search(), Guide(), Cluster(), Mine(), Batch(), Publish())
NAMES = tuple(s.name for s in STAGES)

__all__ = ["NAMES", "STAGES", "Run", "Stage"]
