#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| burnish_stages::fuzzing::dataset(data));
