//! The binary's subcommands besides serving: `calibrate` (writes a model's
//! `<stem>.calibration.json`) and `healthcheck` (the container's probe of a running server).

pub mod calibrate;
pub mod healthcheck;
