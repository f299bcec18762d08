use std::process::ExitCode;

fn main() -> ExitCode {
    gdpr_consumer::cli::main()
}
