//! The AWS chain every client starts from (Kinesis, DynamoDB): the standard chain with the
//! config's region and endpoint on top, and limits on every call.

use std::time::Duration;

use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_kinesis::config::{Credentials, ProvideCredentials, Region};

/// What a service's client builder takes from the chain, and what it must add for a local
/// endpoint the chain has no region or credentials for.
pub struct AwsChain {
    pub sdk: SdkConfig,
    /// us-east-1, for an endpoint without a configured region.
    pub region: Option<Region>,
    /// Placeholders, for an endpoint without credentials (a local emulator).
    pub credentials: Option<Credentials>,
}

/// Loads the chain. The endpoint may come from the config (`endpoint`), or, as the AWS chain
/// has it, from `service_env` (`AWS_ENDPOINT_URL_KINESIS`, say) or `AWS_ENDPOINT_URL` (or a
/// profile's `endpoint_url`): all are treated alike.
pub async fn chain(
    region: Option<&str>,
    endpoint: Option<&str>,
    call_timeout: Duration,
    service_env: &str,
) -> AwsChain {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(region) = region {
        loader = loader.region(Region::new(region.to_owned()));
    }
    if let Some(url) = endpoint {
        loader = loader.endpoint_url(url);
    }
    // Without limits, an endpoint that accepts and never answers stalls a call forever,
    // unseen: a call that times out is a fault like any other (retried, reported).
    loader = loader.timeout_config(
        aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(call_timeout.min(Duration::from_secs(3)))
            .operation_attempt_timeout(call_timeout)
            .operation_timeout(call_timeout * 3)
            .build(),
    );
    let sdk = loader.load().await;
    // The SDK resolves the service-specific variable itself (`Builder::from`), and the
    // global one into `sdk.endpoint_url()`; this only asks whether one is set.
    let set = |url: &str| !url.trim().is_empty();
    let local = endpoint.is_some()
        || std::env::var(service_env).is_ok_and(|url| set(&url))
        || sdk.endpoint_url().is_some_and(set);
    let mut chain = AwsChain {
        sdk,
        region: None,
        credentials: None,
    };
    if !local {
        return chain;
    }
    if chain.sdk.region().is_none() {
        tracing::warn!("no AWS region configured; using us-east-1 for the endpoint");
        chain.region = Some(Region::new("us-east-1"));
    }
    let found = match chain.sdk.credentials_provider() {
        Some(provider) => provider.provide_credentials().await.is_ok(),
        None => false,
    };
    if !found {
        tracing::warn!(
            "no AWS credentials found; signing with placeholder credentials for the configured endpoint"
        );
        chain.credentials = Some(Credentials::new(
            "placeholder",
            "placeholder",
            None,
            None,
            "gdpr-consumer-placeholder",
        ));
    }
    chain
}
