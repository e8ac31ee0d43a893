"""Running vlptune on a Ray cluster: job submission and shared storage.

- :mod:`vlptune.cluster.submit`: ``vlptune submit`` / ``vlptune jobs``: a
  vlptune command as a Ray job with this checkout's code, the cluster's token
  found where Ray looks for it.
- :mod:`vlptune.cluster.storage`: :func:`check_storage`, the check that a
  search on several nodes keeps its results where every node reaches them.
- :mod:`vlptune.cluster.session`: joining a Ray cluster or starting a local
  one (:func:`~vlptune.cluster.session.connect`), and the environment its
  processes get (:data:`~vlptune.cluster.session.RAY_ENV`).

Nothing here imports :mod:`vlptune.search` or :mod:`vlptune.study`.

The cluster definitions themselves (``ray up``, on-premises, KubeRay, the
runtime env) live in the repository's ``cluster/`` directory; its README is
the guide.
"""

from vlptune.cluster.storage import StorageError, check_storage, probe_storage
from vlptune.cluster.submit import ClusterError, find_token, load_runtime_env, resolve_address

__all__ = ["ClusterError", "StorageError", "check_storage", "find_token", "load_runtime_env", "probe_storage", "resolve_address"]
