"""Invoke entry point: `invoke --list`. Every task lives in the `lab` collection (lab/tasks/)."""

from invoke.collection import Collection

from lab.tasks import namespace as lab

ns = Collection()
ns.add_collection(lab)
