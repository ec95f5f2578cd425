"""Several processes, one job, on MLX's own distributed engine (`mlx.launch`, `mx.distributed`).

`ranks.py`: the group, each rank's share of a work list, text sent from rank 0, failures counted.
`agreement.py`: ranks started with different model files or options are refused at start.
`tensor_parallel.py`: the transformer's linear layers sharded across the ranks.
`shard_source.py`: each rank reads its shard of the weights alone from disk.
"""
