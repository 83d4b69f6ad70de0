/* crc32c.h — CRC-32C (Castagnoli), the checksum of the index WAL and the coordinator journal.
 *
 * CRC-32C rather than zlib's CRC-32 because x86 computes it in hardware (SSE4.2 crc32), which
 * keeps checksumming far below the cost of compressing and fsyncing a block; a table-driven
 * slicing-by-8 fallback gives identical results everywhere else.  Check value:
 * twn_crc32c(0, "123456789", 9) == 0xE3069283. */
#ifndef TWN_UTIL_CRC32C_H
#define TWN_UTIL_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* Extends crc (0 to start) over n bytes. */
uint32_t twn_crc32c(uint32_t crc, const void *data, size_t n);
/* The portable table path, always (for tests that compare it with the hardware path). */
uint32_t twn_crc32c_sw(uint32_t crc, const void *data, size_t n);

#endif
