fn main() {
    rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .ok();
}
