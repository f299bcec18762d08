//! Running several daemons on one stream: DynamoDB leases (KCL 2.x format) and the worker's coordinator.
pub mod coordinator;
pub mod lease;
pub mod share;
