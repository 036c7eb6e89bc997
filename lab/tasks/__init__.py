"""The `lab` Invoke collection, one module per kind of work a user does.

- lifecycle: up, mesh, down, status, render
- tools: tools, doctor
- access: trust, hubble
- apps: onboard
- checks: verify, map
- cache: cache (the shared image cache)
- cache: cache (the machine's shared image cache)

Task modules import heavy dependencies (the kubernetes client, rich) on use, so that
`invoke --list` stays fast.
"""

from invoke.collection import Collection

from lab.tasks.access import ACCESS_TASKS
from lab.tasks.apps import APP_TASKS
from lab.tasks.cache import CACHE_TASKS
from lab.tasks.checks import CHECK_TASKS
from lab.tasks.lifecycle import LIFECYCLE_TASKS
from lab.tasks.tools import TOOL_TASKS

namespace = Collection("lab")
for _task in (*LIFECYCLE_TASKS, *TOOL_TASKS, *ACCESS_TASKS, *APP_TASKS, *CHECK_TASKS,
              *CACHE_TASKS):
    namespace.add_task(_task)
