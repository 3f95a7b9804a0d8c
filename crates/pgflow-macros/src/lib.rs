//! The `#[step]` attribute of pgflow. Use it through the `pgflow` crate.
