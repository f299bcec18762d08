use std::process::ExitCode;

/// mimalloc: the daemon allocates and frees a record's strings and payload for every
/// record it reads, from several threads; glibc's allocator spends more time on that
/// than on the rules.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    gdpr_consumer::cli::main()
}
