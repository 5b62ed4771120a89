"""Galleries past one process: shards of index directories searched on Ray, encoding on Ray Data,
and distractors with real structure for the scale benchmark.

- ``views``: augmented views of real photos and a mixture fitted to them (no Ray);
- ``shards``: a shard = one index directory; the fan-out / merge that equals one big index (no Ray);
- ``engine``: the Ray side: ``start_ray`` (loopback locally, ``address=`` on a cluster), ``RayShards``;
- ``encode``: encoding with Ray Data ``map_batches`` over an actor pool, writing shard files;
- ``bench``: the ``--engine ray`` records of ``python -m matcher bench``.

Ray is imported only inside ``engine``, ``encode`` and ``bench`` calls; install it with
``pip install -r requirements-scale.txt``.
"""
