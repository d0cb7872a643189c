//! Workspace integration tests, one binary (hickory's layout): real sockets, real TLS and real
//! processes on loopback.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod advertise;
mod chart;
mod cli_certs;
mod cli_contract;
mod container;
mod control;
mod examples;
mod hub;
mod hub_hardening;
mod istio_rendezvous;
mod relay;
mod relay_security;
mod rendezvous;
mod rendezvous_mesh;
mod rendezvous_nat;
mod rendezvous_sealed;
mod rendezvous_tcp;
mod rotation;
mod shutdown;
mod tampering;
mod task_links;
mod tls;
mod tls_streams;
mod vantage6;
