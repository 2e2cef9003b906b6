//! The parts of the `ringvm` command that other crates (the fuzz targets)
//! use: the HTTP API's parser, types, dispatch, server and client.

pub mod api;
