"""Client keys: who may spend, on which models, how fast and how much (README: "Client keys").

`policy` decides on plain values; `store` keeps keys and their counters in a SQLite file
shared by the workers of a host; `cli` is `llm-proxy keys`.  The pipeline's `gate` stage
uses them at admission and settles each request's reservation when its row is finished.
"""
