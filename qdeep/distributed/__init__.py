"""The distributed layer: everything that runs on Ray (and nothing else imports Ray).

session (start or join Ray), tasks (per-image work, image visibility), storage (is a path shared
by every node?), prepare (what a CNN run prepares on the driver), worker + driver (Ray Train),
deepcluster (the DeepCluster loop in one Ray Train run), features + predict (Ray Data), tune.
"""
