"""Deployment tooling: what starts and tunes Flower's own processes.

- `launcher`: `asyncfl-superexec`, Flower's SuperExec with ClientApp processes forked from a
  warm zygote.
- `supernode`: `asyncfl-supernode`, Flower's SuperNode with short idle and reply polls.
- `pulls`: the short first retry of Flower's object pulls (ServerApp grid and SuperNode).
- `local`: the whole deployment on 127.0.0.1 as real processes (`scripts/local-deployment.sh`).
- `compose`: the docker-compose demo driver (`scripts/compose-demo.sh`).

`local` and `compose` drive a source checkout (the app folder, `scripts/make-certs.sh`, the
compose files); the other three are installed console scripts. All reach Flower's internals
through `asyncfl.flower_hooks` only.
"""
