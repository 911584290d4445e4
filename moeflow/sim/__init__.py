"""The simulation world: a roofline cost model, hardware and model presets, workloads, the
discrete-event simulator (the one execution semantics of `moeflow.scheduler` plus the cost
model), traces, and the calibration of this machine's CPU.

    simulator   Simulator: configuration and `run`     events      the event loop of a run
    replay      plans replayed for many units           results     timings, metrics, trace
    trace       Chrome trace and HTML timeline          tracefile   both, written as it runs
    eps_costs   the eps policy's StageCosts from the cost model of a hardware and dtype

Everything but `calibrate` is pure Python: no torch, asyncio or zmq.
"""
