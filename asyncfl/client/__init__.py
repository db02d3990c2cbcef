"""The client side: what runs on a SuperNode.

- `app`: the Flower ClientApp (message handlers; light: no torch at import, a test checks).
- `worker`: one client task (load, train, delta, encode, emulate heterogeneity, reply).
- `node`: the node's partition and report, its state folder.
- `node_worker`: the node-local persistent worker of deployment, which keeps the model warm
  across Flower's per-message ClientApp processes.
- `state`: client state across tasks (error-feedback residuals, the `shifted` rule's shift).

Nothing here imports the server side (`asyncfl.server_app`, `asyncfl.strategies`).
"""
