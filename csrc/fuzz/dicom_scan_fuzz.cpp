// Fuzz harness for the DICOM structure scanner (medge/dicom_scan.h), built outside the
// package with sanitizers (commands on one line). Two ways to run it:
//
//   libFuzzer (clang):
//     clang++ -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -DMEDGE_LIBFUZZER
//       -Icsrc/include csrc/fuzz/dicom_scan_fuzz.cpp csrc/dicom_scan.cpp -o scan_fuzz && ./scan_fuzz CORPUS/
//   built-in mutation loop (any compiler, e.g. g++ with ASan + UBSan):
//     g++ -std=c++17 -g -O1 -fsanitize=address,undefined -fno-sanitize-recover=all
//       -Icsrc/include csrc/fuzz/dicom_scan_fuzz.cpp csrc/dicom_scan.cpp -o scan_fuzz
//     ./scan_fuzz ITERATIONS SEED file.dcm...
//
// Besides the sanitizers' checks, every accepted scan is checked here: each reported value
// lies inside the buffer and the reported elements come in the order of the wanted list.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "medge/dicom_scan.h"

namespace {

// The elements medge.dicom asks for (medge/dicom.py _FAST_ELEMENTS), sorted by tag.
const medge::WantedElement kWanted[] = {
    {0x00020003u, {'U', 'I'}, medge::WantedKind::kValue},     {0x00020010u, {'U', 'I'}, medge::WantedKind::kValue},
    {0x00080005u, {'C', 'S'}, medge::WantedKind::kValue},     {0x00080018u, {'U', 'I'}, medge::WantedKind::kValue},
    {0x00080060u, {'C', 'S'}, medge::WantedKind::kValue},     {0x00180015u, {'C', 'S'}, medge::WantedKind::kValue},
    {0x00181164u, {'D', 'S'}, medge::WantedKind::kValue},     {0x00280002u, {'U', 'S'}, medge::WantedKind::kValue},
    {0x00280004u, {'C', 'S'}, medge::WantedKind::kValue},     {0x00280008u, {'I', 'S'}, medge::WantedKind::kValue},
    {0x00280010u, {'U', 'S'}, medge::WantedKind::kValue},     {0x00280011u, {'U', 'S'}, medge::WantedKind::kValue},
    {0x00280030u, {'D', 'S'}, medge::WantedKind::kValue},     {0x00280100u, {'U', 'S'}, medge::WantedKind::kValue},
    {0x00280101u, {'U', 'S'}, medge::WantedKind::kValue},     {0x00280103u, {'U', 'S'}, medge::WantedKind::kValue},
    {0x00281050u, {'D', 'S'}, medge::WantedKind::kValue},     {0x00281051u, {'D', 'S'}, medge::WantedKind::kValue},
    {0x00281052u, {'D', 'S'}, medge::WantedKind::kValue},     {0x00281053u, {'D', 'S'}, medge::WantedKind::kValue},
    {0x00281055u, {'L', 'O'}, medge::WantedKind::kValue},     {0x00281056u, {'C', 'S'}, medge::WantedKind::kValue},
    {0x00283000u, {'S', 'Q'}, medge::WantedKind::kRefused},   {0x00283010u, {'S', 'Q'}, medge::WantedKind::kRefused},
    {0x52009229u, {'S', 'Q'}, medge::WantedKind::kRefused},   {0x52009230u, {'S', 'Q'}, medge::WantedKind::kRefused},
    {0x7FE00008u, {'O', 'F'}, medge::WantedKind::kRefused},   {0x7FE00009u, {'O', 'D'}, medge::WantedKind::kRefused},
    {0x7FE00010u, {'O', 'B'}, medge::WantedKind::kPixelData},
};
constexpr std::size_t kWantedCount = sizeof(kWanted) / sizeof(kWanted[0]);

void check(const uint8_t* data, std::size_t size) {
  const medge::ScanResult r = medge::scan_dicom(data, size, kWanted, kWantedCount);
  if (r.status != medge::ScanStatus::kOk) {
    if (!r.found.empty() || !r.undefined.empty()) std::abort();  // a fallback reports nothing
    return;
  }
  uint32_t previous = 0;
  bool first = true;
  for (const medge::FoundElement& e : r.found) {
    if (e.index >= kWantedCount || e.offset > size || e.length > size - e.offset) std::abort();
    if (!first && e.index <= previous) std::abort();
    previous = e.index;
    first = false;
    volatile uint8_t sink = 0;  // touch the reported bytes: ASan flags any that are outside the buffer
    for (uint64_t i = 0; i < e.length; i += 997) sink = sink ^ data[e.offset + i];
    (void)sink;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  // A private copy: ASan then sees reads past the exact end of the input.
  std::vector<uint8_t> copy(data, data + size);
  check(copy.empty() ? nullptr : copy.data(), copy.size());
  return 0;
}

#ifndef MEDGE_LIBFUZZER
int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s ITERATIONS SEED FILE...\n", argv[0]);
    return 2;
  }
  const long iterations = std::atol(argv[1]);
  std::mt19937_64 rng(std::strtoull(argv[2], nullptr, 10));
  std::vector<std::vector<uint8_t>> seeds;
  for (int i = 3; i < argc; ++i) {
    std::ifstream f(argv[i], std::ios::binary);
    seeds.emplace_back(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  }
  const uint32_t interesting[] = {0u, 1u, 2u, 4u, 7u, 8u, 12u, 0x7Fu, 0xFFu, 0x100u, 0xFFFEu, 0xFFFFu, 0x10000u,
                                  0x7FFFFFFFu, 0x80000000u, 0xFFFFFFF0u, 0xFFFFFFFEu, 0xFFFFFFFFu};
  long accepted = 0;
  for (long n = 0; n < iterations; ++n) {
    std::vector<uint8_t> d = seeds[rng() % seeds.size()];
    const int operations = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < operations && !d.empty(); ++k) {
      const std::size_t at = rng() % d.size();
      switch (rng() % 7) {
        case 0:  // byte
          d[at] = static_cast<uint8_t>(rng());
          break;
        case 1: {  // a 16- or 32-bit field (lengths, tags)
          const uint32_t v = interesting[rng() % (sizeof(interesting) / sizeof(interesting[0]))];
          const std::size_t width = (rng() & 1) ? 4 : 2;
          for (std::size_t b = 0; b < width && at + b < d.size(); ++b) d[at + b] = static_cast<uint8_t>(v >> (8 * b));
          break;
        }
        case 2:  // truncate
          d.resize(at);
          break;
        case 3:  // delete a chunk
          d.erase(d.begin() + static_cast<long>(at), d.begin() + static_cast<long>(std::min(d.size(), at + rng() % 64)));
          break;
        case 4: {  // insert a chunk
          std::vector<uint8_t> chunk(1 + rng() % 64);
          for (auto& c : chunk) c = static_cast<uint8_t>(rng());
          d.insert(d.begin() + static_cast<long>(at), chunk.begin(), chunk.end());
          break;
        }
        case 5: {  // an undefined length, or an item / delimiter tag
          static const uint8_t kMarks[][4] = {{0xFF, 0xFF, 0xFF, 0xFF}, {0xFE, 0xFF, 0x00, 0xE0},
                                              {0xFE, 0xFF, 0x0D, 0xE0}, {0xFE, 0xFF, 0xDD, 0xE0}};
          const uint8_t* m = kMarks[rng() % 4];
          for (std::size_t b = 0; b < 4 && at + b < d.size(); ++b) d[at + b] = m[b];
          break;
        }
        default: {  // duplicate a slice elsewhere (nested-looking structures)
          const std::size_t from = rng() % d.size();
          const std::size_t len = std::min<std::size_t>(d.size() - from, 1 + rng() % 256);
          std::vector<uint8_t> slice(d.begin() + static_cast<long>(from), d.begin() + static_cast<long>(from + len));
          d.insert(d.begin() + static_cast<long>(at), slice.begin(), slice.end());
        }
      }
    }
    std::vector<uint8_t> exact(d);  // exactly sized: an overread is outside the allocation
    check(exact.empty() ? nullptr : exact.data(), exact.size());
    accepted += medge::scan_dicom(exact.data(), exact.size(), kWanted, kWantedCount).status == medge::ScanStatus::kOk;
  }
  std::printf("%ld iterations, %ld accepted by the scanner, no sanitizer finding\n", iterations, accepted);
  return 0;
}
#endif
