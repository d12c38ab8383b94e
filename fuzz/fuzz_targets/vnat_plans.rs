#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tpvpn_fuzz::vnat_plans(data));
